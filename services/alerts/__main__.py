from libs.common.launch import service_main
from services.alerts import app

service_main(app)
