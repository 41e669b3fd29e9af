from libs.common.launch import service_main
from services.charts import app

service_main(app)
