from libs.common.launch import service_main
from services.vlm import app

service_main(app)
